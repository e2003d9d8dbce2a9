//! Micro-benchmark of the GraphQL check: parse strictly, expand fragments, check every top-level
//! field and its bound arguments, and build the canonical request the upstream receives.

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
        arguments: [(
            valet_core::rules::ArgumentPath::parse("project.id").expect("a path"),
            valet_core::rules::ValueRule::Param("project".into()),
        )]
        .into_iter()
        .collect(),
    };
    let params = [("project".to_string(), "p".to_string())]
        .into_iter()
        .collect();
    let body = serde_json::json!({
        "query": "query P($id: String!) { project(id: $id) { id name services { edges { node { id name } } } ...More } } fragment More on Project { environments { edges { node { id } } } }",
        "variables": {"id": "p"},
    })
    .to_string();
    criterion.bench_function("GraphQL check (query with fragment)", |bench| {
        bench.iter(|| {
            valet_core::graphql::check_body(std::hint::black_box(body.as_bytes()), &allow, &params)
                .expect("allowed")
        })
    });
}

criterion_group!(benches, graphql);
criterion_main!(benches);
