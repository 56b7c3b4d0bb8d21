-- The Resources view's host scope (every GPU of one host, over all its runs) reads `gpu_1m` filtered by host. The
-- table is ordered by run, so at fleet scale that read went through every run's minutes. A projection keeps the
-- same rows ordered by host, and the store reads it for a query filtered on host: one host's granules. Merges
-- rebuild it ('rebuild'), so it stays the rollup's exact copy as rows merge; MATERIALIZE builds it for the rows
-- stored before this migration (in the background on a large table; until then those parts are read as before).
ALTER TABLE gpu_1m MODIFY SETTING deduplicate_merge_projection_mode = 'rebuild';
ALTER TABLE gpu_1m ADD PROJECTION IF NOT EXISTS gpu_1m_by_host (SELECT * ORDER BY host, gpu_index, minute);
ALTER TABLE gpu_1m MATERIALIZE PROJECTION gpu_1m_by_host;
