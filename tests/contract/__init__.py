"""The connector contract as capability mixins (kombu's `t/integration/common.py` style).

Sources: a source's test class subclasses `SourceContract` plus the mixin of each capability its
source declares (`OffsetContract` or `AckContract`, `PauseContract`) and `RebalanceContract` where
its group can move units between members, and provides the hooks of `ContractBase`. The memory
connector's classes are in `test_source_memory.py`; each real broker's are in its integration
module, beside what only that broker does. Dead-letter destinations and stores: `store.py`.
"""

from tests.contract.acks import AckContract
from tests.contract.harness import ContractBase, RecordingListener, poll_n, settle
from tests.contract.offsets import OffsetContract
from tests.contract.pause import PauseContract
from tests.contract.rebalance import RebalanceContract
from tests.contract.source import SourceContract

__all__ = [
    "AckContract",
    "ContractBase",
    "OffsetContract",
    "PauseContract",
    "RebalanceContract",
    "RecordingListener",
    "SourceContract",
    "poll_n",
    "settle",
]
