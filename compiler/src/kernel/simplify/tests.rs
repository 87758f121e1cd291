use super::*;
use proptest::prelude::*;

fn eval(i: &Idx, vars: &[i64]) -> i64 {
    match i {
        Idx::Var(v) => vars[*v],
        Idx::Const(c) => *c,
        Idx::Add(a, b) => eval(a, vars) + eval(b, vars),
        Idx::Mul(a, c) => eval(a, vars) * c,
        Idx::Div(a, c) => eval(a, vars).div_euclid(*c),
        Idx::Rem(a, c) => eval(a, vars).rem_euclid(*c),
        Idx::Clamp(a, lo, hi) => eval(a, vars).clamp(*lo, *hi),
        Idx::Load(_, a) => eval(a, vars) * 3 - 7,
    }
}

fn v(n: usize) -> Box<Idx> {
    Box::new(Idx::Var(n))
}

fn linearize(idx: &[Idx], shape: &[i64]) -> Idx {
    let mut acc = idx[0].clone();
    for (i, n) in idx.iter().zip(shape).skip(1) {
        acc = Idx::Add(Box::new(Idx::Mul(Box::new(acc), *n)), Box::new(i.clone()));
    }
    acc
}

#[test]
fn reshape_chains_fold_back() {
    // b82 of MiniLM's query projection: a [2,5,12,32] view of a [10, 384] product.
    let shape = [2, 5, 12, 32];
    let r: Vec<(i64, i64)> = shape.iter().map(|&n| (0, n - 1)).collect();
    let flat = linearize(
        &[Idx::Var(0), Idx::Var(1), Idx::Var(2), Idx::Var(3)],
        &shape,
    );
    let d = |n| Box::new(Idx::Div(Box::new(flat.clone()), n));
    let row = Idx::Add(
        Box::new(Idx::Mul(d(1920), 5)),
        Box::new(Idx::Rem(d(384), 5)),
    );
    let col = Idx::Rem(Box::new(flat.clone()), 384);
    let two = linearize(&[row, col], &[10, 384]);
    let again = linearize(
        &[
            Idx::Div(Box::new(two.clone()), 384),
            Idx::Rem(Box::new(two), 384),
        ],
        &[10, 384],
    );
    let s = Affine::from_idx(&again, &r);
    assert_eq!(s, Affine::from_idx(&flat, &r));
    assert_eq!(
        s.to_idx().to_string(),
        "(((i0*1920 + i1*384) + i2*32) + i3)"
    );
}

#[test]
fn div_rem_pairs_fold_without_ranges() {
    let x = Idx::Add(Box::new(Idx::Mul(v(0), 7)), v(1));
    let e = Idx::Add(
        Box::new(Idx::Mul(Box::new(Idx::Div(Box::new(x.clone()), 6)), 6)),
        Box::new(Idx::Rem(Box::new(x.clone()), 6)),
    );
    assert_eq!(simplify(&e, &[]), simplify(&x, &[]));
}

#[test]
fn clamps_in_range_vanish_and_factors_cancel() {
    let r = [(0, 9)];
    assert_eq!(simplify(&Idx::Clamp(v(0), 0, 9), &r), Idx::Var(0));
    assert_eq!(simplify(&Idx::Clamp(v(0), 12, 20), &r), Idx::Const(12));
    let e = Idx::Rem(Box::new(Idx::Mul(v(0), 4)), 8);
    assert_eq!(simplify(&e, &r).to_string(), "(i0 % 2)*4");
}

fn arb_idx() -> impl Strategy<Value = Idx> {
    let leaf = prop_oneof![
        (0usize..3).prop_map(Idx::Var),
        (-20i64..40).prop_map(Idx::Const),
    ];
    leaf.prop_recursive(5, 40, 2, |inner| {
        prop_oneof![
            (inner.clone(), inner.clone()).prop_map(|(a, b)| Idx::Add(Box::new(a), Box::new(b))),
            (inner.clone(), -6i64..12).prop_map(|(a, k)| Idx::Mul(Box::new(a), k)),
            (inner.clone(), 1i64..13).prop_map(|(a, k)| Idx::Div(Box::new(a), k)),
            (inner.clone(), 1i64..13).prop_map(|(a, k)| Idx::Rem(Box::new(a), k)),
            (inner.clone(), -3i64..10, 0i64..10).prop_map(|(a, lo, w)| Idx::Clamp(
                Box::new(a),
                lo,
                lo + w
            )),
            inner.prop_map(|a| Idx::Load(0, Box::new(a))),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]
    #[test]
    fn simplification_preserves_values(
        i in arb_idx(),
        ext in proptest::collection::vec(1i64..9, 3),
        pt in proptest::collection::vec(0i64..1000, 3),
    ) {
        let r: Vec<(i64, i64)> = ext.iter().map(|&n| (0, n - 1)).collect();
        let vars: Vec<i64> = pt.iter().zip(&ext).map(|(p, n)| p % n).collect();
        let s = simplify(&i, &r);
        prop_assert_eq!(eval(&s, &vars), eval(&i, &vars), "{} became {}", i, s);
        let a = Affine::from_idx(&i, &r);
        let (lo, hi) = a.range(&r);
        if !a.has_load() {
            let x = eval(&i, &vars) as i128;
            prop_assert!(lo <= x && x <= hi, "{} = {} outside [{}, {}]", i, x, lo, hi);
        }
    }
}

#[test]
fn divisions_by_a_multiple_of_a_stride_split_off_the_small_part() {
    // MiniLM at B=8, T=128: a [1024, 384] matmul operand read through a [8, 128, 384] view:
    // j + 49152·((384·i + j) / 49152) + 384·(i % 128) is the plain 384·i + j.
    let r = [(0, 1023), (0, 383)];
    let x = Idx::Add(Box::new(Idx::Mul(v(0), 384)), v(1));
    let e = Idx::Add(
        Box::new(Idx::Add(
            v(1),
            Box::new(Idx::Mul(
                Box::new(Idx::Div(Box::new(x.clone()), 49152)),
                49152,
            )),
        )),
        Box::new(Idx::Mul(Box::new(Idx::Rem(v(0), 128)), 384)),
    );
    assert_eq!(simplify(&e, &r).to_string(), "(i0*384 + i1)");
    assert_eq!(
        simplify(&Idx::Div(Box::new(x.clone()), 49152), &r).to_string(),
        "(i0 / 128)"
    );
    assert_eq!(
        simplify(&Idx::Rem(Box::new(x.clone()), 49152), &r).to_string(),
        "(i1 + (i0 % 128)*384)"
    );
    // Without the range (j may reach 384) nothing splits.
    let wide = [(0, 1023), (0, 384)];
    assert_eq!(
        simplify(&Idx::Div(Box::new(x), 49152), &wide).to_string(),
        "((i0*384 + i1) / 49152)"
    );
}
