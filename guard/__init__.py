"""hallucination-guard: read a language model's own neurons while it answers.

The runtime half: load a model (`guard.model`), capture per-neuron CETT with hooks
(`guard.neurons`), load a verified probe artifact (`guard.probe`), turn captured
neurons into risks (`guard.scoring`), decide (`guard.policy`), generate under guard
(`guard.generation`) and serve it over HTTP (`guard.api`).
"""

__version__ = "0.1.0"
