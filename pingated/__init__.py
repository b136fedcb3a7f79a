"""
pingated: a PIN gate and streaming reverse proxy for self-hosted tools.

The public surface is the twistd plugin (C{twistd pingated}) and the
C{pingated} command; modules below are one concern each.
"""

__version__ = "0.1.0"
