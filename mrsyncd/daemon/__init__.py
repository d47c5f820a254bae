"""
The long-running services that ``twistd mrsyncd`` builds (`tap`): the
master (jobs, fleet, job store) and the node, with their configuration,
metrics and systemd readiness.
"""
