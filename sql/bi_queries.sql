-- BI queries over the scoring table (DuckDB). Replace ${OUTPUT} with the table root given to
-- jobs/score.py --output (a local folder; for s3:// load DuckDB's httpfs extension first).
-- Every statement here runs in tests/test_score_job.py.

-- Every published file. Fast, and correct except for the file of a run that crashed between
-- publishing and committing, until the next run removes it: use committed_predictions to be strict.
CREATE OR REPLACE VIEW predictions AS
SELECT * FROM read_parquet('${OUTPUT}/predictions/**/*.parquet',
                           hive_partitioning = true, union_by_name = true);

-- Only the files that a commit record lists (the ledger the scoring job itself trusts).
CREATE OR REPLACE VIEW committed_predictions AS
SELECT p.* EXCLUDE (filename)
FROM read_parquet('${OUTPUT}/predictions/**/*.parquet',
                  hive_partitioning = true, union_by_name = true, filename = true) AS p
WHERE parse_filename(p.filename) IN (
    SELECT parse_filename(f.path)
    FROM (SELECT unnest(files) AS f
          FROM read_json('${OUTPUT}/_commits/*.json', columns = {
              'files': 'STRUCT(path VARCHAR, "rows" BIGINT)[]'})));

-- One row per input: the newest scoring wins (after a --full rescore or a new model).
CREATE OR REPLACE VIEW latest_predictions AS
SELECT * FROM committed_predictions
QUALIFY row_number() OVER (PARTITION BY source_uri ORDER BY scored_at DESC, run_id DESC) = 1;

-- Predicted class counts per specimen.
SELECT specimen_id, pred_label, count(*) AS cells, round(avg(confidence), 3) AS mean_confidence
FROM latest_predictions
WHERE status = 'ok'
GROUP BY specimen_id, pred_label
ORDER BY specimen_id, pred_label;

-- Errors by kind (the message up to its first ':' or '('), with an example file.
SELECT trim(regexp_extract(error, '^[^:(]*')) AS error_kind, count(*) AS files,
       min(source_uri) AS example
FROM latest_predictions
WHERE status = 'error'
GROUP BY error_kind
ORDER BY files DESC, error_kind;

-- Runs: what each one wrote.
SELECT run_id, model_name, model_version, min(scored_at) AS started, count(*) AS rows,
       count(*) FILTER (WHERE status = 'ok') AS ok, count(*) FILTER (WHERE status = 'error') AS errors
FROM committed_predictions
GROUP BY run_id, model_name, model_version
ORDER BY started;

-- Low-confidence predictions to review by hand.
SELECT source_uri, specimen_id, pred_label, confidence
FROM latest_predictions
WHERE status = 'ok' AND confidence < 0.6
ORDER BY confidence
LIMIT 100;
