"""README's numbers come from docs/: each decimal number or thousands-grouped count in README.md's prose and
tables (outside code blocks; versions excluded) appears in a file under docs/ (a generated table, a committed
record or the page that quotes its command)."""
import glob
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUMBER = re.compile(r"(?<![\w.])[-+]?\d{1,3}(?:,\d{3})+(?![\w.])|(?<![\w.])[-+]?\d+\.\d+[Mk]?(?![\w.])")
VERSION = re.compile(r"(?:Python|torch|fairseq|sacreBLEU|version)\s*(?:>=\s*)?[\d.]+|\d+\.\d+\.\d+|\d+\.\d+\.\*")


def readme_numbers():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        text = re.sub(r"```.*?```", "", f.read(), flags=re.S)  # commands are not results
    text = VERSION.sub("", text)
    return sorted({n.lstrip("+") for n in NUMBER.findall(text)})


def docs_text():
    parts = []
    for path in glob.glob(os.path.join(REPO, "docs", "*.md")) + glob.glob(os.path.join(REPO, "docs", "*.json")):
        with open(path, encoding="utf-8") as f:
            parts.append(f.read())
    return "\n".join(parts)


def test_every_readme_number_is_in_a_docs_record():
    numbers, docs = readme_numbers(), docs_text()
    assert len(numbers) >= 10  # the check reads the numbers (not an empty pattern)
    missing = [n for n in numbers if n not in docs]
    assert not missing, "README numbers found in no docs/ file: %s" % missing


def test_the_check_fails_on_a_number_not_in_docs():
    docs = docs_text()
    assert "17.92" in docs and "917.923" not in docs
