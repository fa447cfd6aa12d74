"""Talking to backends: the keep-alive transport (the only geventhttpclient user) and the health prober.
"""
