"""OBD-II data: the PID catalogue and the one place request bytes are made."""
