"""Announcing VIPs to routers over BGP, through a speaker passlb drives.

`announce` (pure) decides which VIPs this node announces and why;
`bird_config` (pure) renders BIRD 2's config and reads `birdc` output;
`bird` runs and supervises BIRD; `agent` connects them to the daemon.
"""
