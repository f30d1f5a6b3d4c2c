"""Data pipeline: prompt formats and roles, sources, MDS writer, dataset and collator."""
