"""SPO-tree: trees of fixed-length segments grown per prompt (`growth`), node values and edge advantages
(`values`, pure), the edge replay buffer (`replay`), and the method that drives them in the loop (`method`)."""
