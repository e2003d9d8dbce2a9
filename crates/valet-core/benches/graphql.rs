//! Micro-benchmark of the GraphQL check: parse, expand fragments, check every top-level field.

use criterion::{Criterion, criterion_group, criterion_main};
use valet_core::rules::GraphqlAllow;

fn graphql(criterion: &mut Criterion) {
    let allow = GraphqlAllow {
        query: ["project", "projects"]
            .into_iter()
            .map(String::from)
            .collect(),
        mutation: ["customDomainCreate"]
            .into_iter()
            .map(String::from)
            .collect(),
    };
    let body = serde_json::json!({
        "query": "query P($id: String!) { project(id: $id) { id name services { edges { node { id name } } } ...More } } fragment More on Project { environments { edges { node { id } } } }",
        "variables": {"id": "p"},
    })
    .to_string();
    criterion.bench_function("GraphQL check (query with fragment)", |bench| {
        bench.iter(|| {
            valet_core::graphql::check(std::hint::black_box(body.as_bytes()), &allow)
                .expect("allowed")
        })
    });
}

criterion_group!(benches, graphql);
criterion_main!(benches);
