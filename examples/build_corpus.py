#!/usr/bin/env python3
"""Build a small real German-English parallel corpus for the kd-plugin demo.

Source: Debian's LibreOffice help packages ``libreoffice-help-de`` and ``libreoffice-help-en-us`` (MPL-2.0).
Both ship the same HTML pages under ``usr/share/libreoffice/help/{de,en-US}/`` and every translatable text
element (p, h1-h6, td, li, span, div) carries the same ``id`` (``par_*``, ``hd_*``) in both languages, so
sentence pairs align on (relative file, id, occurrence index). Nothing is installed: the ``.deb`` files are
fetched with ``apt-get download`` and unpacked with ``dpkg -x`` into a cache directory.

Without apt-get, pass any parallel corpus as ``--tsv FILE`` (``de<TAB>en`` per line); it is split the same way.

Output: ``OUT/{train,valid,test}.{de,en}``, one sentence per line (skipped when already there).

    python examples/build_corpus.py --out work/demo/corpus [--cache work/cache] [--tsv FILE] [--seed 1]
"""
import argparse
import glob
import html
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


def read_tsv(path):
    """(de, en) pairs from a ``de<TAB>en`` file."""
    pairs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            fields = line.rstrip("\n").split("\t")
            if len(fields) != 2:
                raise CorpusError("%s:%d: expected 'de<TAB>en', got %d field(s)" % (path, lineno, len(fields)))
            pairs.append((normalize(fields[0]), normalize(fields[1])))
    return pairs


def clean(pairs):
    """Drop empty pairs and untranslated ones (de == en); keep the first of each duplicate pair."""
    seen, kept = set(), []
    for de, en in pairs:
        if de and en and de != en and (de, en) not in seen:
            seen.add((de, en))
            kept.append((de, en))
    return kept


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


def outputs(out_dir):
    return [os.path.join(out_dir, "%s.%s" % (s, lang)) for s in SPLITS for lang in LANGS]


def write_atomic(out_dir, splits):
    """Write all six files into a temporary directory next to ``out_dir`` and move them in place."""
    os.makedirs(out_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-corpus-", dir=out_dir)
    try:
        for name, pairs in splits.items():
            for i, lang in enumerate(LANGS):
                with open(os.path.join(tmp, "%s.%s" % (name, lang)), "w", encoding="utf-8") as f:
                    f.writelines(pair[i] + "\n" for pair in pairs)
        for name in splits:
            for lang in LANGS:
                fname = "%s.%s" % (name, lang)
                os.replace(os.path.join(tmp, fname), os.path.join(out_dir, fname))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def stats(pairs):
    """Number of pairs and median/mean English length in words."""
    lengths = [len(en.split()) for _, en in pairs]
    return {"pairs": len(pairs), "median_en_words": statistics.median(lengths),
            "mean_en_words": round(statistics.mean(lengths), 1)}


def build(out_dir, cache_dir="work/cache", tsv=None, seed=1, log=print):
    """Build ``out_dir/{train,valid,test}.{de,en}`` (no-op if present); return {split: number of pairs}."""
    if all(os.path.isfile(p) for p in outputs(out_dir)):
        sizes = {s: count_lines(os.path.join(out_dir, s + ".en")) for s in SPLITS}
        log("corpus: %s already built (%s)" % (out_dir, ", ".join("%s %d" % kv for kv in sizes.items())))
        return sizes
    if tsv:
        raw = read_tsv(tsv)
        source = tsv
    else:
        try:
            roots = fetch_help(cache_dir)
        except (CorpusError, OSError, subprocess.CalledProcessError) as e:
            raise CorpusError("cannot fetch the LibreOffice help packages (%s).\n"
                              "Pass your own parallel corpus instead: --tsv FILE.tsv (demo: --data FILE.tsv "
                              "or DATA=FILE.tsv), one 'de<TAB>en' pair per line." % e) from e
        raw = align_help(roots)
        source = "%s + %s (MPL-2.0)" % (PACKAGES["de"], PACKAGES["en"])
    pairs = clean(raw)
    log("corpus: %s: %d aligned, %d unique non-identical pairs, median %s / mean %s English words"
        % (source, len(raw), len(pairs), *list(stats(pairs).values())[1:]))
    splits = split(pairs, seed)
    write_atomic(out_dir, splits)
    sizes = {s: len(p) for s, p in splits.items()}
    log("corpus: wrote %s (%s)" % (out_dir, ", ".join("%s %d" % kv for kv in sizes.items())))
    return sizes


def count_lines(path):
    with open(path, encoding="utf-8") as f:
        return sum(1 for _ in f)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="work/demo/corpus", help="output directory")
    parser.add_argument("--cache", default="work/cache", help="where the .deb files are downloaded and unpacked")
    parser.add_argument("--tsv", help="use this de<TAB>en file instead of the LibreOffice help")
    parser.add_argument("--seed", type=int, default=1, help="seed of the train/valid/test split")
    args = parser.parse_args(argv)
    try:
        build(args.out, args.cache, args.tsv, args.seed)
    except CorpusError as e:
        sys.exit("build_corpus: " + str(e))


if __name__ == "__main__":
    main()
