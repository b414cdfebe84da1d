"""The examples' data generator, evaluator and model preparation, importable (from the repository root) by the
quality benchmark, which extends the same tasks and scores them the same way."""
