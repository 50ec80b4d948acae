//! Partitions as the product of generators: each generator a variable name
//! and its values in order, the first varying slowest. [`for_each_product`]
//! walks the product without holding it; [`nth_partition`] decodes one
//! partition from its position in that walk.

use super::{Partition, Value};

/// Calls `f` with every partition of the cartesian product of `generators`
/// (each a variable name and its values, in order), reusing one partition
/// buffer so nothing is allocated per partition beyond cloned string values.
/// No generators yields one empty partition; a generator with no values
/// yields nothing.
pub fn for_each_product(generators: &[(String, Vec<Value>)], mut f: impl FnMut(&Partition)) {
    if generators.iter().any(|(_, values)| values.is_empty()) {
        return;
    }
    let mut partition = Partition {
        vars: generators
            .iter()
            .map(|(name, values)| (name.clone(), values[0].clone()))
            .collect(),
    };
    let mut index = vec![0usize; generators.len()];
    loop {
        f(&partition);
        // Advance the odometer: the last generator varies fastest.
        let mut pos = generators.len();
        loop {
            if pos == 0 {
                return;
            }
            pos -= 1;
            index[pos] += 1;
            if index[pos] < generators[pos].1.len() {
                partition.vars[pos].1 = generators[pos].1[index[pos]].clone();
                break;
            }
            index[pos] = 0;
            partition.vars[pos].1 = generators[pos].1[0].clone();
        }
    }
}

/// The `n`-th partition of the product `for_each_product` walks (the last
/// generator varies fastest).
pub fn nth_partition(generators: &[(String, Vec<Value>)], mut n: u64) -> Partition {
    let mut vars = Vec::with_capacity(generators.len());
    for (name, values) in generators.iter().rev() {
        let len = values.len() as u64;
        let value = &values[usize::try_from(n % len).unwrap_or(0)];
        n /= len;
        vars.push((name.clone(), value.clone()));
    }
    vars.reverse();
    Partition { vars }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn product_visits_every_combination_in_order() {
        let gens = vec![
            (
                "a".to_string(),
                vec![Value::Str("1".into()), Value::Str("2".into())],
            ),
            (
                "b".to_string(),
                vec![
                    Value::Str("x".into()),
                    Value::Str("y".into()),
                    Value::Str("z".into()),
                ],
            ),
        ];
        let mut seen = Vec::new();
        for_each_product(&gens, |p| seen.push(p.key()));
        assert_eq!(
            seen,
            [
                "a=1,b=x", "a=1,b=y", "a=1,b=z", "a=2,b=x", "a=2,b=y", "a=2,b=z"
            ]
        );
        let mut n = 0;
        for_each_product(&[], |p| {
            assert!(p.vars.is_empty());
            n += 1;
        });
        assert_eq!(n, 1);
        for_each_product(&[("a".into(), Vec::new())], |_| n += 1);
        assert_eq!(n, 1);
    }
}
