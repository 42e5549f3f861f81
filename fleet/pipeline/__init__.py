"""The flywheel loop on Ray: the only place that wires every floor together."""
