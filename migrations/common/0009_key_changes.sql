-- Every key change in commit order (PostgreSQL; SQLite has no other nodes to tell): each node
-- polls it besides LISTEN, so a node whose notification connection went quiet without closing
-- still learns of every change within a bound (SECURITY.md "Several nodes"). Pruned to the
-- last 10,000 changes.
CREATE TABLE key_changes (
    seq BIGINT NOT NULL PRIMARY KEY,
    tenant TEXT NOT NULL,
    key_name TEXT NOT NULL,
    at BIGINT NOT NULL
);
