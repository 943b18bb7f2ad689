"""What a config means over time: restart policy, the differences of two configs, migration of stored ones."""
