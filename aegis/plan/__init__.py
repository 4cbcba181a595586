"""Planning: placing instances on nodes, devices, CPU cores and ports; sizing a fleet."""
