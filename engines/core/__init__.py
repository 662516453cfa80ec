"""What every layer shares: the package contract (manifest), the model's shape and precision, prompts,
the DyVTE rule (router features, the exit decision, what an exit does to a batch) and the user-facing
error. It imports nothing from the rest of the project, so the runtime deploys without the exporter.
"""
