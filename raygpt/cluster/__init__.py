"""The Ray cluster: joining it, what fits on it, and checks of `ray up` YAML files."""
