"""What a condition may look at: one received instance and how it arrived."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from pydicom import Dataset


@dataclass
class InstanceFacts:
    """Everything a rule can test about one received instance.

    The dataset is the header only (the receiver stops before pixel data), so
    rules stay cheap to evaluate for every instance. Association details are
    passed alongside because they are not part of the dataset.
    """

    dataset: Dataset
    calling_ae: str = ""
    called_ae: str = ""
    source_address: str = ""
    #: Time of reception; aware datetimes are converted to the router's local time
    #: before ``ReceivedAt`` windows are checked, naive ones are taken as local.
    received_at: datetime | None = None
