"""The device-side runtimes: each turns one message from the aggregator into its replies.

`splitfed.client.ClientRuntime` (split CNN, also FedAvg's local training) and its base
`splitfed.device.DeviceRuntime` stay at their historical paths; the PyVertical data owner and
the FedSL segment live here. The simulator calls them directly, the edge agent over MQTT.
"""

from __future__ import annotations

from splitfed.client import ClientRuntime
from splitfed.device import DeviceRuntime
from splitfed.devices.owner import OwnerRuntime
from splitfed.devices.segment import SegmentRuntime

__all__ = ["ClientRuntime", "DeviceRuntime", "OwnerRuntime", "SegmentRuntime"]
