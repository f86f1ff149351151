"""Retention: what stored objects, history and audit rows are deleted, and when.

Policy (``policy``): the eligibility rules as SQL. Purge (``purge``): the crash-safe
deletion of objects and orphans. Prune (``prune``): history and audit rows. The
sweeper that runs them every ``retention.interval`` lives in the dispatch process
(``dispatch/service.py``); ``dicomrouter purge`` runs the same pass by hand.
"""

from .purge import PurgeBusy, Purger, PurgeReport

__all__ = ["PurgeBusy", "PurgeReport", "Purger"]
