"""Batch scoring without Ray, one module per stage, in the order a run goes through them:

    config   ScoringConfig: what one run scores, with what, into where
    run      ScoringRun: one run's lock, ledger, commits and summaries on the driver
    inputs   list the inputs and key them for the ledger
    prepare  read + decode + preprocess (CPU): the field row of each input, plus cell rows
    predict  Predictor: the model on prepared pixels (eager or fast path)
    chunks   scored rows held until their input is complete, cut into chunks of whole inputs
    table    the output table's columns (one declaration: name, type, description) and rows
    store    the output root: commit protocol, publishing of files, reading the ledger back
    lock     the writer lock: one run per output root
    ledger   the digests of the inputs committed for a model: what a rerun skips
    summary  run accounting and the per-specimen summary

``rows`` is the vocabulary they share (status, row kinds, schema version). ``pipelines/score.py``
wires them with Ray Data; see docs/SCORING.md for the table layout.
"""
