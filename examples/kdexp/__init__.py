"""The examples' library: one job per module; the drivers (examples/*.py) import it and nothing else of examples/.

    pipeline      cached steps under a work directory, the repository's paths, file helpers (sha256, atomic writes)
    corpus        the LibreOffice help de-en corpus or a user's TSV: aligned, cleaned, split
    data          the demo's data steps: corpus, sentencepiece BPE, fairseq-preprocess
    configs       every configuration's fairseq-train flags, criterion flags built from the registered dataclass
    recipes       the shared commands: teacher, students, distillation, teacher cache, evaluation, records
    options       the demo's command line (sizes, corpus, languages, parallelism), shared by the drivers
    speed         CTranslate2 export, sizes and the interleaved speed phase (also `python -m kdexp.speed ct2`)
    report        the demo's markdown table and the machine description
    mix           multi-seed comparisons: records, paired bootstrap, report (compare_mix, distill_engines)
    distill       distill_engines' engines, corpora and report
    study         the study's grid; study_levels (complexity levels), study_report (tables, plots, estimate)
    warm          console scripts in forks of one warm process (the tests' runs; drivers with KDEXP_WARM=1)

Layering (a module imports only modules of earlier groups): warm | pipeline, corpus, configs | data, speed,
study_levels | report | recipes | options, mix | distill, study_report | study. A driver run as
``python examples/NAME.py`` finds this package next to it; tests find it through pytest.ini's ``pythonpath``,
the benchmark through ``PYTHONPATH=examples`` (make bench).
"""
