"""A small real German-English parallel corpus for the kd-plugin demo (or a user's TSV, split and cleaned).

Source: Debian's LibreOffice help packages ``libreoffice-help-de`` and ``libreoffice-help-en-us`` (MPL-2.0).
Both ship the same HTML pages under ``usr/share/libreoffice/help/{de,en-US}/`` and every translatable text
element (p, h1-h6, td, li, span, div) carries the same ``id`` (``par_*``, ``hd_*``) in both languages, so
sentence pairs align on (relative file, id, occurrence index). Nothing is installed: the ``.deb`` files are
fetched with ``apt-get download`` and unpacked with ``dpkg -x`` into a cache directory.

Without apt-get, pass any parallel corpus as ``--tsv FILE`` (``SRC<TAB>TGT`` per line, languages
``--src-lang``/``--tgt-lang``, default de/en); it is split the same way.

Cleaning (:func:`clean`, both sources), in the spirit of Moses' ``clean-corpus-n.perl``: a pair is dropped
when a side is empty, when a side has more than ``max_tokens`` whitespace tokens (250) or ``max_chars``
characters (1500: a mis-split line of thousands of characters would otherwise reach fairseq, whose
transformer takes at most 1024 positions), when the token counts differ by more than ``max_ratio`` (9, Moses'
default), when it is untranslated (source == target), or when it repeats an earlier pair. On the LibreOffice
help the three length filters drop nothing (longest side: 204 tokens, 1,377 characters; largest ratio
below 9). The counts per reason are logged and written to ``OUT/cleaning.json``.

Output: ``OUT/{train,valid,test}.{SRC,TGT}``, one sentence per line (skipped when already there). The command
line: examples/build_corpus.py.
"""
import glob
import html
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from html.parser import HTMLParser

PACKAGES = {"de": "libreoffice-help-de", "en": "libreoffice-help-en-us"}
HELP_DIRS = {"de": "usr/share/libreoffice/help/de", "en": "usr/share/libreoffice/help/en-US"}
TEXT_TAGS = {"p", "h1", "h2", "h3", "h4", "h5", "h6", "td", "li", "span", "div"}
ID_RE = re.compile(r"^(par|hd)_")
VOID_TAGS = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
SPLITS = ("train", "valid", "test")
LANGS = ("de", "en")
TEST_SIZE, VALID_SIZE = 1000, 500
# Moses clean-corpus-n style limits (see the module docstring)
CLEAN_LIMITS = {"max_tokens": 250, "max_chars": 1500, "max_ratio": 9.0}
CLEANING_FILE = "cleaning.json"


class CorpusError(RuntimeError):
    """A corpus cannot be built; the message says what to do instead."""


class IdTextParser(HTMLParser):
    """Collect the whitespace-normalized full text of every element whose ``id`` is ``par_*``/``hd_*``.

    ``self.texts`` maps ``(id, occurrence)`` to the text, nested inline children included.
    """

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack = []  # [tag, key or None, list of text chunks or None]
        self.texts = {}
        self.seen = {}

    def handle_starttag(self, tag, attrs):
        if tag in VOID_TAGS:
            return
        ident = dict(attrs).get("id") or ""
        key = None
        if tag in TEXT_TAGS and ID_RE.match(ident):
            occurrence = self.seen.get(ident, 0)
            self.seen[ident] = occurrence + 1
            key = (ident, occurrence)
        self.stack.append([tag, key, [] if key else None])

    def handle_startendtag(self, tag, attrs):
        pass  # self-closing elements hold no text

    def handle_endtag(self, tag):
        if not any(entry[0] == tag for entry in self.stack):
            return  # stray end tag
        while self.stack:
            open_tag, key, chunks = self.stack.pop()
            if key is not None:
                self.texts[key] = normalize("".join(chunks))
            if open_tag == tag:
                break

    def handle_data(self, data):
        for entry in self.stack:
            if entry[2] is not None:
                entry[2].append(data)


def normalize(text):
    """Unescape leftover entities and collapse every whitespace run to one space."""
    return " ".join(html.unescape(text).split())


def extract_texts(path):
    parser = IdTextParser()
    with open(path, encoding="utf-8", errors="replace") as f:
        parser.feed(f.read())
    parser.close()
    return parser.texts


def fetch_help(cache_dir):
    """Download and unpack both help packages into ``cache_dir``; return {lang: help root}."""
    deb_dir = os.path.join(cache_dir, "debs")
    root = os.path.join(cache_dir, "libreoffice-help")
    roots = {lang: os.path.join(root, HELP_DIRS[lang]) for lang in LANGS}
    if all(os.path.isdir(r) for r in roots.values()):
        return roots
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise CorpusError("apt-get/dpkg not found")
    os.makedirs(deb_dir, exist_ok=True)
    for lang in LANGS:
        deb = download_deb(PACKAGES[lang], deb_dir)
        subprocess.run(["dpkg", "-x", deb, root], check=True)
    return roots


def download_deb(package, deb_dir):
    """``apt-get download`` one package (running ``apt-get update`` once if the lists are missing)."""
    found = glob.glob(os.path.join(deb_dir, package + "_*.deb"))
    if found:
        return found[0]
    cmd = ["apt-get", "download", "-q", package]
    result = subprocess.run(cmd, cwd=deb_dir, capture_output=True, text=True)
    if result.returncode != 0:
        print("apt-get download %s failed; running apt-get update" % package, file=sys.stderr)
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, text=True)
        result = subprocess.run(cmd, cwd=deb_dir, capture_output=True, text=True)
    found = glob.glob(os.path.join(deb_dir, package + "_*.deb"))
    if result.returncode != 0 or not found:
        raise CorpusError("apt-get download %s failed: %s" % (package, result.stderr.strip()[-500:]))
    return found[0]


def align_help(roots):
    """Aligned (de, en) pairs from the two help trees, in a deterministic (file, id, occurrence) order."""
    pairs = []
    en_root = roots["en"]
    for en_path in sorted(glob.glob(os.path.join(en_root, "**", "*.html"), recursive=True)):
        rel = os.path.relpath(en_path, en_root)
        de_path = os.path.join(roots["de"], rel)
        if not os.path.isfile(de_path):
            continue
        en_texts, de_texts = extract_texts(en_path), extract_texts(de_path)
        for key in sorted(en_texts.keys() & de_texts.keys()):
            pairs.append((de_texts[key], en_texts[key]))
    return pairs


def read_tsv(path, langs=LANGS):
    """(source, target) pairs from a ``SRC<TAB>TGT`` file; CorpusError (naming the file) if it is malformed."""
    pairs = []
    try:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise CorpusError("%s:%d: not UTF-8 text" % (path, lineno)) from None
                fields = line.rstrip("\r\n").split("\t")
                if len(fields) != 2:
                    raise CorpusError("%s:%d: expected '%s<TAB>%s', got %d field(s)"
                                      % (path, lineno, langs[0], langs[1], len(fields)))
                pairs.append((normalize(fields[0]), normalize(fields[1])))
    except OSError as e:
        raise CorpusError("%s: cannot read (%s)" % (path, e.strerror or e)) from None
    if not pairs:
        raise CorpusError("%s: empty file (expected one '%s<TAB>%s' pair per line)" % (path, langs[0], langs[1]))
    return pairs


def drop_reason(src, tgt, max_tokens, max_chars, max_ratio):
    """Why Moses-style cleaning drops the pair (a key of :func:`reasons`), or None to keep it."""
    if not src or not tgt:
        return "empty"
    n_src, n_tgt = len(src.split()), len(tgt.split())
    if max(n_src, n_tgt) > max_tokens:
        return "tokens"
    if max(len(src), len(tgt)) > max_chars:
        return "chars"
    if max(n_src / n_tgt, n_tgt / n_src) > max_ratio:
        return "ratio"
    if src == tgt:
        return "untranslated"
    return None


def reasons(max_tokens, max_chars, max_ratio):
    """{reason key: what it means}, in the order :func:`drop_reason` checks them (then duplicates)."""
    return {"empty": "empty side", "tokens": "over %d tokens" % max_tokens,
            "chars": "over %d characters" % max_chars, "ratio": "length ratio over %g" % max_ratio,
            "untranslated": "untranslated (source == target)", "duplicate": "duplicate pair"}


def clean(pairs, max_tokens=CLEAN_LIMITS["max_tokens"], max_chars=CLEAN_LIMITS["max_chars"],
          max_ratio=CLEAN_LIMITS["max_ratio"]):
    """(kept pairs in input order, {reason: number dropped}): :func:`drop_reason`, then the first of each
    duplicate pair is kept."""
    seen, kept = set(), []
    dropped = dict.fromkeys(reasons(max_tokens, max_chars, max_ratio), 0)
    for pair in pairs:
        reason = drop_reason(*pair, max_tokens, max_chars, max_ratio) or ("duplicate" if pair in seen else None)
        if reason:
            dropped[reason] += 1
        else:
            seen.add(pair)
            kept.append(pair)
    return kept, dropped


def cleaning_summary(read, kept, dropped, limits=CLEAN_LIMITS):
    """'N pairs read, M kept; dropped K: a empty side, b over 250 tokens, ...' (reasons with a count)."""
    names = reasons(**limits)
    parts = ["%s %s" % ("{:,}".format(n), names[k]) for k, n in dropped.items() if n]
    return "%s pairs read, %s kept; dropped %s%s" % (
        "{:,}".format(read), "{:,}".format(kept), "{:,}".format(read - kept), ": " + ", ".join(parts) if parts else "")


def load_tsv(path, langs=LANGS, limits=CLEAN_LIMITS):
    """The cleaned pairs of a user's TSV and the cleaning record ({"read", "kept", "dropped", "limits"})."""
    raw = read_tsv(path, langs)
    pairs, dropped = clean(raw, **limits)
    return pairs, {"read": len(raw), "kept": len(pairs), "dropped": dropped, "limits": dict(limits)}


def split(pairs, seed, test_size=TEST_SIZE, valid_size=VALID_SIZE):
    """Shuffle with ``seed``; take test then valid, keeping out of train any pair whose source is in test/valid."""
    if len(pairs) <= test_size + valid_size:
        raise CorpusError("only %d pairs: need more than %d (test) + %d (valid)"
                          % (len(pairs), test_size, valid_size))
    order = list(pairs)
    random.Random(seed).shuffle(order)
    test, valid, rest = [], [], []
    held_out = set()
    for pair in order:
        if len(test) < test_size and pair[0] not in held_out:
            test.append(pair)
            held_out.add(pair[0])
        elif len(valid) < valid_size and pair[0] not in held_out:
            valid.append(pair)
            held_out.add(pair[0])
        else:
            rest.append(pair)
    train = [p for p in rest if p[0] not in held_out]
    return {"train": train, "valid": valid, "test": test}


def outputs(out_dir, langs=LANGS):
    return [os.path.join(out_dir, "%s.%s" % (s, lang)) for s in SPLITS for lang in langs]


def write_atomic(out_dir, splits, langs=LANGS, cleaning=None):
    """Write the six files (and ``cleaning`` as cleaning.json) into a temporary directory inside ``out_dir``
    and move them in place."""
    os.makedirs(out_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-corpus-", dir=out_dir)
    try:
        names = []
        for name, pairs in splits.items():
            for i, lang in enumerate(langs):
                names.append("%s.%s" % (name, lang))
                with open(os.path.join(tmp, names[-1]), "w", encoding="utf-8") as f:
                    f.writelines(pair[i] + "\n" for pair in pairs)
        if cleaning is not None:
            names.insert(0, CLEANING_FILE)
            with open(os.path.join(tmp, CLEANING_FILE), "w") as f:
                json.dump(cleaning, f, indent=1)
        for fname in names:
            os.replace(os.path.join(tmp, fname), os.path.join(out_dir, fname))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_cleaning(out_dir):
    """The cleaning record build() wrote into ``out_dir``, or None (a corpus built before it existed)."""
    try:
        with open(os.path.join(out_dir, CLEANING_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def stats(pairs):
    """Number of pairs and median/mean target length in words."""
    lengths = [len(tgt.split()) for _, tgt in pairs]
    return {"pairs": len(pairs), "median_tgt_words": statistics.median(lengths),
            "mean_tgt_words": round(statistics.mean(lengths), 1)}


def build(out_dir, cache_dir="work/cache", tsv=None, seed=1, log=print, langs=LANGS, limits=CLEAN_LIMITS):
    """Build ``out_dir/{train,valid,test}.{SRC,TGT}`` (no-op if present); return {split: number of pairs}.
    Without ``tsv`` (the LibreOffice help) ``langs`` must be de, en."""
    if all(os.path.isfile(p) for p in outputs(out_dir, langs)):
        sizes = {s: count_lines(os.path.join(out_dir, "%s.%s" % (s, langs[1]))) for s in SPLITS}
        log("corpus: %s already built (%s)" % (out_dir, ", ".join("%s %d" % kv for kv in sizes.items())))
        return sizes
    if tsv:
        pairs, cleaning = load_tsv(tsv, langs, limits)
        source = tsv
    else:
        if tuple(langs) != LANGS:
            raise CorpusError("the LibreOffice help corpus is de-en; pass a TSV for %s-%s" % tuple(langs))
        try:
            roots = fetch_help(cache_dir)
        except (CorpusError, OSError, subprocess.CalledProcessError) as e:
            raise CorpusError("cannot fetch the LibreOffice help packages (%s).\n"
                              "Pass your own parallel corpus instead: --tsv FILE.tsv (demo: --data FILE.tsv "
                              "or DATA=FILE.tsv), one 'de<TAB>en' pair per line." % e) from e
        raw = align_help(roots)
        pairs, dropped = clean(raw, **limits)
        cleaning = {"read": len(raw), "kept": len(pairs), "dropped": dropped, "limits": dict(limits)}
        source = "%s + %s (MPL-2.0)" % (PACKAGES["de"], PACKAGES["en"])
    log("corpus: %s: %s" % (source, cleaning_summary(cleaning["read"], cleaning["kept"], cleaning["dropped"],
                                                     cleaning["limits"])))
    log("corpus: median %s / mean %s %s words per sentence" % (*list(stats(pairs).values())[1:], langs[1]))
    try:
        splits = split(pairs, seed)
    except CorpusError as e:
        raise CorpusError("%s: %s" % (source, e)) from None
    write_atomic(out_dir, splits, langs, cleaning)
    sizes = {s: len(p) for s, p in splits.items()}
    log("corpus: wrote %s (%s)" % (out_dir, ", ".join("%s %d" % kv for kv in sizes.items())))
    return sizes


def count_lines(path):
    with open(path, encoding="utf-8") as f:
        return sum(1 for _ in f)


def add_clean_args(parser):
    """--clean-max-tokens, --clean-max-chars, --clean-max-ratio (shared with examples/demo.py)."""
    parser.add_argument("--clean-max-tokens", type=int, default=CLEAN_LIMITS["max_tokens"],
                        help="drop pairs with a side of more whitespace tokens")
    parser.add_argument("--clean-max-chars", type=int, default=CLEAN_LIMITS["max_chars"],
                        help="drop pairs with a side of more characters")
    parser.add_argument("--clean-max-ratio", type=float, default=CLEAN_LIMITS["max_ratio"],
                        help="drop pairs whose token counts differ by a larger factor (Moses' ratio)")


def clean_limits(parser, args):
    """The limits of :func:`add_clean_args`' flags as :func:`clean` keywords (range-checked)."""
    for flag, value in (("--clean-max-tokens", args.clean_max_tokens), ("--clean-max-chars", args.clean_max_chars),
                        ("--clean-max-ratio", args.clean_max_ratio)):
        if not value >= 1:
            parser.error("%s must be >= 1 (got %s)" % (flag, value))
    return {"max_tokens": args.clean_max_tokens, "max_chars": args.clean_max_chars,
            "max_ratio": args.clean_max_ratio}
