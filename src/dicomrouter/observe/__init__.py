"""Observability: Prometheus metrics (:mod:`.metrics`, :mod:`.collector`) and
webhook alerts (:mod:`.alerts`).

Kept apart from the pipeline packages, which only call the few cheap recording
functions of :mod:`.metrics`; everything that reads the index runs in the HTTP
process, at scrape or evaluation time.
"""
