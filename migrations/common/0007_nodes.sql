-- Nodes seen recently (server.node_id and when), for the XKS health answer's fleet size.
CREATE TABLE nodes (
    node_id TEXT NOT NULL PRIMARY KEY,
    last_seen BIGINT NOT NULL
);
