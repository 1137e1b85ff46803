"""Scale-out: data-parallel replicas behind SGLang's router (`data_parallel`), and one model
over several processes on JAX's multi-controller runtime (`multihost`, `mirror`)."""
