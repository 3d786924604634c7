"""Offline probe training: questions, answers, judgements, CETT features, probes.

The data half: `probes.datasets` (QA loaders, splits), `probes.collect` (batched,
resumable answer collection), `probes.judge` (TriviaQA-style correctness and answer
spans), `probes.extract` (CETT features to disk shards, `FeatureStore`). Training and
evaluation build on the `FeatureStore`. Imports `guard`; `guard` never imports this
package (except the CLI, lazily).
"""
