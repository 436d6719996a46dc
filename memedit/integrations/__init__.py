"""Integrations that put memedit in front of existing chat stacks (HTTP server, LangChain).

Nothing is imported here at package import time; import the submodules you need.
"""
