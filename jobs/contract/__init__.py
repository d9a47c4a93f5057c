"""The contract between the DAG package and the stages: standard library only, imported by both `dags/` and
`jobs/`, and the only part of `jobs/` Composer needs.

- `stages`: the registry (module, config, image, default profile, artifacts written and read)
- `configs`: each stage's typed options (`spec`), from which the CLI, the DAG's Params and the Job's arguments derive
- `artifacts`: every file name a stage writes and another reads; `layout`: where a run's prefixes are
- `errors`: exit codes and the exceptions that map to them; `documents`: manifest, progress, error, reports,
  parity and champion, with schema versions; `rows` and `splits`: the format of a preprocessing output
"""
