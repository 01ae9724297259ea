"""Pure logic shared by the coordinator and the clients: no Flower glue."""
