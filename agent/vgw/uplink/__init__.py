"""The MQTT uplink and what guards it: packet caps, named TLS failures, certificate renewal."""
