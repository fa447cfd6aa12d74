"""The LLM-aware routing benchmark (issue #16): ``scripts/bench-routing``, see ``__main__``."""
