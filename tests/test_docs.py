"""README's numbers come from generated output: every number in README.md equals a number that a command
wrote, in a generated block under docs/ or in a committed record (docs/*.json).

README numbers: every number in README.md's prose, tables and the shell comments of its code blocks ("# ...
(~20 min)"); the rest of a code block and every `code span` are commands and flag values, not results.
Integers count. A number is compared as written, with its scale and unit: grouping commas dropped, a leading
"+" dropped, a "-" kept only where it is a sign (not in a range such as "16.2-17.0"), trailing zeros kept
("0.10" is not "0.1"), and a unit x, %, s, min or h attached ("3.03x", "99.7%", "279 s", "~20 min"), so a
number with a unit matches only a source number written with that unit ("~20 min" does not match a "20" of
some table, nor "19.3 min").

Sources, and what matches in each:
- generated blocks: docs/DEMO.md and docs/PLATEAU.md (examples/demo.py and examples/plateau.py --report write
  the whole file) and every region of a docs/*.md
  between `<!-- NAME: BEGIN (generated, do not edit) -->` and `<!-- NAME: END -->`. A README number matches a
  number token of a block exactly (as a whole token: "24.3" does not match "24.31").
- committed records, docs/*.json: a number of a record matches when it rounds, at the README number's own
  decimals, to exactly the README number ("17.07" matches a record's 17.0712...; an integer matches only an
  integer). Validation curves (each record's `valid` list) are left out: hundreds of losses and perplexities
  that no README sentence quotes, and that would match stale numbers by chance.
- summaries of those records, computed here as the drivers' reports compute them: per compare_mix
  configuration and epoch count (mix_results.json) and per study cell and method (study_results.json), the
  mean and the sample standard deviation over seeds of BLEU and chrF, at 2 decimals ("17.92 ± 0.10").
- a number with a scale suffix ("1.43M", "7.9k") also matches any source number that, divided by 1e6 / 1e3
  and rounded at its decimals, equals it ("1.43M" and DEMO.md's "1,433,600").
Records carry no units but for times: a field named *seconds gives its value in s too.

What this cannot catch: a stale number that happens to be another source's number. Small integers ("3
epochs") and short decimals occur in many sources, so they are checked only weakly; a stale mean, interval,
time or ratio is caught unless its new value collides with an unrelated one.

Not measurements, so not checked (each pattern below, nothing broader):
- version numbers: "Python 3.11", "torch 2.13.0", "fairseq 0.12.2", any a.b.c;
- dates (YYYY-MM-DD) and the year of a citation ("IJCAI 2024", "Kim & Rush 2016");
- references to issues and sections ("issue 28", "sections 4-5") and the numbers of the numbered steps
  ("**1. Cache the teacher once**");
- digits inside a name ("fp16", "int8", "float32", "x86_64", "MPL-2.0");
- a flag and its value where they are not in a code span (in a code block's comment: "--beam 4");
- the rows of the flag table (a row whose first cell is a `--flag`): the code's defaults and definitions,
  which `kd-flags` prints from the registered dataclasses.
"""
import glob
import json
import os
import re
import statistics
from collections import defaultdict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(REPO, "docs")

# a number: grouped integer or plain decimal; a sign only where nothing word-like precedes it (so the "-" of a
# range is no sign); then an optional scale (M, k) and an optional unit (x, %, s, min, h)
NUMBER = re.compile(r"(?<![\w.,])([-+]?)(\d{1,3}(?:,\d{3})+|\d+(?:\.\d+)?)(?!\d)([Mk](?![A-Za-z]))?"
                    r"(x(?![A-Za-z])|%|[ -](?:s|min|minutes?|h|hours?)(?![A-Za-z]))?")
UNITS = {"x": "x", "%": "%", "s": "s", "min": "min", "minute": "min", "minutes": "min", "h": "h", "hour": "h",
         "hours": "h"}
FENCE = re.compile(r"```.*?```", re.S)
NOT_MEASUREMENTS = [
    re.compile(r"^\|\s*`--.*$", re.M),                                   # rows of the flag table
    re.compile(r"`[^`]*`"),                                               # code spans (may wrap a line)
    re.compile(r"(?<!\w)--[A-Za-z][\w-]*(?:[ =][^\s,;)]+)?"),               # a flag and its value
    re.compile(r"\]\([^)\s]*\)"),                                        # link targets
    re.compile(r"(?:Python|torch|fairseq|sacreBLEU)\s*(?:>=\s*)?\d+(?:\.\d+)+"),  # versions
    re.compile(r"\d+\.\d+\.\d+"),                                        # a.b.c versions
    re.compile(r"\b\d{4}-\d{2}-\d{2}\b"),                                # dates
    re.compile(r"(?:\b[A-Z][A-Za-z]*|et al\.)\s+(?:19|20)\d{2}\b"),      # citation years
    re.compile(r"\b(?:[Ii]ssues?|[Ss]ections?)\s+\d+(?:\s*(?:-|,|and)\s*\d+)*"),  # references
    re.compile(r"^\*\*\d+\.", re.M),                                     # numbered steps
    re.compile(r"[A-Za-z_][\w-]*\d[\w.-]*"),                             # digits inside a name
]
GENERATED = re.compile(r"<!-- (\S+): BEGIN \(generated, do not edit\) -->(.*?)<!-- \1: END -->", re.S)
SCALES = {"M": 1e6, "k": 1e3}
WHOLLY_GENERATED = ("DEMO.md", "PLATEAU.md")  # written whole by examples/demo.py and examples/plateau.py --report


def tokens(text):
    """(number, number with its scale and unit) for every number of ``text``: "+3.03x" -> ("3.03", "3.03x")."""
    out = []
    for sign, digits, scale, unit in NUMBER.findall(text):
        n = ("-" if sign == "-" else "") + digits.replace(",", "")
        out.append((n, n + scale + (UNITS[unit.strip(" -")] if unit else "")))
    return out


def numbers_in(text):
    return [full for _, full in tokens(text)]


def readme_numbers(text):
    """The README numbers of ``text`` (a README), in order of appearance, after the exclusions above. Of a
    code block only its shell comments are read (what follows a " # ")."""
    comments = []
    for block in FENCE.findall(text):
        comments += [m.group(1) for m in re.finditer(r"(?:^|\s)#\s(.*)$", block, re.M)]
    text = FENCE.sub(" ", text) + "\n" + "\n".join(comments)
    for pattern in NOT_MEASUREMENTS:
        text = pattern.sub(" ", text)
    return numbers_in(text)


def generated_text():
    """docs/DEMO.md, docs/PLATEAU.md and every generated block of docs/*.md."""
    parts = []
    for path in sorted(glob.glob(os.path.join(DOCS, "*.md"))):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if os.path.basename(path) in WHOLLY_GENERATED:
            parts.append(text)
        else:
            parts.extend(body for _, body in GENERATED.findall(text))
    return parts


def record_values():
    """(value, unit) of every number of docs/*.json except validation curves (unit "s" for a field named
    *seconds), and the per-seed summaries (mean, sample std) of BLEU and chrF."""
    values = []

    def walk(x, key=""):
        if isinstance(x, dict):
            for k, v in x.items():
                if k != "valid":
                    walk(v, k)
        elif isinstance(x, list):
            for v in x:
                walk(v, key)
        elif isinstance(x, (int, float)) and not isinstance(x, bool):
            values.append((x, "s" if key.endswith("seconds") else ""))

    records = {}
    for path in sorted(glob.glob(os.path.join(DOCS, "*.json"))):
        with open(path, encoding="utf-8") as f:
            records[os.path.basename(path)] = json.load(f)
        walk(records[os.path.basename(path)])
    groups = defaultdict(list)
    for r in records.get("mix_results.json", []):
        groups[("mix", r["config"], r["epochs"])].append(r)
    for r in records.get("study_results.json", []):
        groups[("study", r["cell"], r["method"])].append(r)
    summaries = []
    for runs in groups.values():
        for key in ("bleu", "chrf"):
            xs = [r[key] for r in runs]
            summaries.append(statistics.mean(xs))
            if len(xs) > 1:
                summaries.append(statistics.stdev(xs))
    return values, summaries


def sources():
    """Every string a README number (with its scale and unit) may equal."""
    found = set()
    scaled = []
    for text in generated_text():
        for n, full in tokens(text):
            found.update((n, full))
            scaled.append(abs(float(n)))
    values, summaries = record_values()
    for v, unit in values:
        forms = ["%.*f" % (d, v) for d in range(1, 5)]
        if float(v).is_integer():
            forms.append(str(int(v)))
        found.update(forms + [f + unit for f in forms])
        scaled.append(abs(v))
    found.update("%.2f" % v for v in summaries)
    for n in scaled:
        for suffix, scale in SCALES.items():
            if n >= scale / 100:
                found.update("%.*f%s" % (d, n / scale, suffix) for d in range(4))
    return found


def unsourced(readme_text, found=None):
    """README numbers of ``readme_text`` that no source has, in order of appearance."""
    found = sources() if found is None else found
    missing = []
    for n in readme_numbers(readme_text):
        if n not in found and n not in missing:
            missing.append(n)
    return missing


def readme():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        return f.read()


def test_every_readme_number_is_in_a_generated_block_or_record():
    text = readme()
    assert len(readme_numbers(text)) >= 40  # the check reads the numbers (not an empty pattern)
    missing = unsourced(text)
    assert not missing, "README numbers in no generated block or record under docs/: %s" % missing


def test_the_sources_are_read():
    assert len(generated_text()) >= 4  # DEMO.md, DISTILL.md's, PERFORMANCE.md's and ON_POLICY.md's blocks
    values, summaries = record_values()
    assert len(values) > 500 and len(summaries) > 50


def test_a_planted_stale_number_is_caught():
    """Plant stale numbers into a copy of the README: a mean one digit off, a number that is only a prefix of
    a generated number (the old guard's hole: "24.3" passed because "24.31" was in docs/), a time with its
    unit whose number exists elsewhere without that unit, and a ratio. The guard names each of them, in
    order, and nothing else; the unplanted README passes."""
    text, found = readme(), sources()
    blocks = "\n".join(generated_text())
    prefix = next(n[:-1] for n in numbers_in(blocks)
                  if re.fullmatch(r"\d+\.\d\d", n) and n[:-1] not in found)
    assert prefix in blocks  # a substring check would have accepted it
    # the README's first "mean ± std" whose mean, one digit off, is no source number
    mean = next(m for m in re.findall(r"(\d+\.\d\d) ± \d+\.\d\d", text) if "%.2f" % (float(m) + 0.01) not in found)
    stale = "%.2f" % (float(mean) + 0.01)
    assert mean in found and mean + " ± " in text
    assert "20" in found and "20min" not in found  # "~20 min": 20 is a source number, 20 minutes is not
    assert "0.39x" not in found
    planted = (text.replace(mean + " ± ", stale + " ± ", 1)
               + "\nThe teacher scores %s BLEU; `make demo` takes ~20 min; on-policy KD runs 0.39x as fast.\n" % prefix)
    assert unsourced(planted, found) == [stale, prefix, "20min", "0.39x"]
    assert unsourced(text, found) == []


def test_exclusions_are_narrow():
    """Exactly the excluded forms are dropped; numbers next to them are read, with their units."""
    text = ("torch 2.13.0 and Python 3.11 (IJCAI 2024, issue 28, sections 4-5, 2026-12-02) fp16 int8 top-8: "
            "`--beam 5` 7.5 BLEU in 279 s, 3.03x, 99.7%, ~20 min, +2.90 [-0.36, +0.31], 16.2-17.0, 33,888, 1.43M\n"
            "| `--kd-alpha` | 0.5 | weight |\n**1. Cache**\n```bash\nmake demo  # ~5-minute run, --beam 4\n```\n")
    assert readme_numbers(text) == ["7.5", "279s", "3.03x", "99.7%", "20min", "2.90", "-0.36", "0.31", "16.2",
                                    "17.0", "33888", "1.43M", "5min"]
