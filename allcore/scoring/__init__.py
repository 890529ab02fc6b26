"""Batch scoring without Ray, one module per stage, in the order a run goes through them:

    config   ScoringConfig: what one run scores, with what, into where
    inputs   list the inputs and key them for the ledger
    prepare  read + decode + preprocess (CPU): the field row of each input, plus cell rows
    predict  Predictor: the model on prepared pixels (eager or fast path)
    table    the output table's columns (one declaration: name, type, description) and rows
    store    the output root's commit protocol, writer lock and publishing of files
    summary  run accounting and the per-specimen summary

``pipelines/score.py`` wires them with Ray Data; see docs/SCORING.md for the table layout.
"""
