"""mode-cl orchestration: the command line, and (later) Ray Train/Tune and MLflow wiring."""
