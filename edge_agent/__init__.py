"""The edge agent: camera -> face -> eye crop -> client half -> MQTT (`edge-agent` command)."""
