"""Host-shared routing state (in-flight counts, limits, the prefix index): the I/O side of routing.

The decisions themselves are pure and live in ``ntonix.core.routing``.
"""
