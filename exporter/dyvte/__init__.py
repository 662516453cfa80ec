"""DyVTE's hyper-network: routers, their files, the exit rule (and, later, their training)."""
