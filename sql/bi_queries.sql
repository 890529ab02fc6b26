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

-- The newest scoring of each input wins (after a --full rescore or a new model): its field row
-- and, for --per-cell runs, its cell rows. Files older than row_kind hold field rows only.
CREATE OR REPLACE VIEW latest_predictions AS
SELECT p.* FROM committed_predictions AS p
JOIN (SELECT source_uri, run_id FROM committed_predictions
      WHERE coalesce(row_kind, 'field') = 'field'
      QUALIFY row_number() OVER (PARTITION BY source_uri ORDER BY scored_at DESC, run_id DESC) = 1)
USING (source_uri, run_id);

-- Predicted class counts per specimen (field-level calls).
SELECT specimen_id, pred_label, count(*) AS fields, round(avg(confidence), 3) AS mean_confidence
FROM latest_predictions
WHERE status = 'ok' AND coalesce(row_kind, 'field') = 'field'
GROUP BY specimen_id, pred_label
ORDER BY specimen_id, pred_label;

-- Errors by kind (error_kind; files from before it: the message up to its first ':' or '('),
-- with an example file.
SELECT coalesce(error_kind, trim(regexp_extract(error, '^[^:(]*'))) AS kind, count(*) AS files,
       min(source_uri) AS example
FROM latest_predictions
WHERE status = 'error'
GROUP BY kind
ORDER BY files DESC, kind;

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

-- Per-cell rows (jobs/score.py --per-cell): one per detected white cell, newest scoring per input.
CREATE OR REPLACE VIEW cell_predictions AS
SELECT * FROM latest_predictions WHERE row_kind = 'cell';

-- Specimen summary computed from the cell rows, per specimen and model: the same numbers as the
-- <out>/specimen_summary/ table the job writes (class counts as a map here, as columns there).
-- Blast fraction over the trusted cells (call is not 'abstain') with a 95% Wilson interval
-- (z = 1.959964); abstained cells (their field needs review) are counted separately.
CREATE OR REPLACE VIEW specimen_summary AS
WITH counts AS (
    SELECT specimen_id, model_sha256,
           count(*) FILTER (row_kind = 'field' AND status = 'ok') AS fields_scored,
           count(*) FILTER (row_kind = 'field' AND status = 'error') AS fields_with_errors,
           count(*) FILTER (row_kind = 'field' AND status = 'ok' AND cell_count = 0)
               AS fields_without_cells,
           count(*) FILTER (row_kind = 'field' AND status = 'ok' AND needs_review)
               AS fields_needing_review,
           count(*) FILTER (row_kind = 'cell') AS cells_total,
           histogram(pred_label) FILTER (row_kind = 'cell') AS cells_by_class,
           count(*) FILTER (row_kind = 'cell' AND call = 'abstain') AS cells_abstained,
           count(*) FILTER (row_kind = 'cell' AND coalesce(call = 'blast', is_blast)) AS blast_cells,
           count(*) FILTER (row_kind = 'cell' AND call IS DISTINCT FROM 'abstain') AS n,
           list(cell_id ORDER BY blast_probability DESC, cell_id)
               FILTER (row_kind = 'cell')[1:5] AS top_suspicious_cells
    FROM latest_predictions
    WHERE specimen_id IN (SELECT specimen_id FROM latest_predictions WHERE row_kind = 'cell')
    GROUP BY specimen_id, model_sha256),
z AS (SELECT 1.959964 AS z)
SELECT counts.* EXCLUDE (top_suspicious_cells, n),
       blast_cells / nullif(n, 0) AS blast_fraction,
       (blast_fraction + z * z / (2 * n)
        - z * sqrt(blast_fraction * (1 - blast_fraction) / n
                   + z * z / (4 * n * n))) / (1 + z * z / n)
           AS blast_ci_low,
       (blast_fraction + z * z / (2 * n)
        + z * sqrt(blast_fraction * (1 - blast_fraction) / n
                   + z * z / (4 * n * n))) / (1 + z * z / n)
           AS blast_ci_high,
       top_suspicious_cells
FROM counts, z;

-- Specimens by blast fraction, with the cells to look at first.
SELECT specimen_id, cells_total, blast_cells, round(blast_fraction, 3) AS blast_fraction,
       round(blast_ci_low, 3) AS ci_low, round(blast_ci_high, 3) AS ci_high, top_suspicious_cells
FROM specimen_summary
ORDER BY blast_fraction DESC NULLS LAST, specimen_id;
