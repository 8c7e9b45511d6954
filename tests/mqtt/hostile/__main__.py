"""`python -m tests.mqtt.hostile ...`: the hostile publisher as its own process."""

from .publish import main

main()
