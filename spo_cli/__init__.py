"""spo: reinforcement learning of LLM reasoning with segment-level credit assignment.

Importing this package must stay cheap: no torch, no transformers (see tests/unit/test_import_hygiene.py).
"""

__version__ = "0.1.0"
