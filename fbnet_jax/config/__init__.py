"""What a config means over time: restart policy, differences of configs, stored-config migration."""
