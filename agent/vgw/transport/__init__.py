"""What every MQTT client of the tree shares, the agent's and the cloud's alike: the TLS context and the MQTT version
rule."""
