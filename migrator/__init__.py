"""migrator: live migration of a VM's files between two blkfs mounts (to come)."""
