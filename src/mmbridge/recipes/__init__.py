"""Stage configs (YAML) shipped with mmbridge; load them with `mmbridge train`."""
