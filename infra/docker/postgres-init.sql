-- Run once by the postgres image on an empty data directory (/docker-entrypoint-initdb.d/): the server's first
-- database (POSTGRES_DB) is Prefect's; MLflow's backend store gets its own, owned by the same role.
CREATE DATABASE mlflow;
