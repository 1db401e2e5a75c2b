"""python_api: the federated trainer that runs full GLFC and FCCL on top of fcl_ext.

Planned layout (see README): config, data, models, methods/glfc, methods/fccl,
engine (in-process and Flower), metrics, report, checkpoint, cli.
"""
