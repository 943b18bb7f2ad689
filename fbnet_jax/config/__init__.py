"""What a config means over time: restart policy, config differences, stored-config migration."""
